"""megafusion.interop"""
