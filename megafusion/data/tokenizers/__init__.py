"""megafusion.data.tokenizers"""
