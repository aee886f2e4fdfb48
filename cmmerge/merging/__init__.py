"""cmmerge.merging"""
