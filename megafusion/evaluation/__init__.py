"""megafusion.evaluation"""
