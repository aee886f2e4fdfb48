"""cmmerge.stages"""
