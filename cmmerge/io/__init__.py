"""cmmerge.io"""
