"""megafusion.planning"""
