"""cmmerge.reporting"""
