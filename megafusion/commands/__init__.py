"""megafusion.commands"""
