"""cmmerge.evaluation"""
