"""megafusion.data.codecs.pixel"""
