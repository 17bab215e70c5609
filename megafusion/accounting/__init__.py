"""megafusion.accounting"""
