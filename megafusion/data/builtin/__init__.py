"""megafusion.data.builtin"""
