"""megafusion.inference"""
