"""megafusion.data.formats"""
