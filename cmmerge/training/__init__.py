"""cmmerge.training"""
