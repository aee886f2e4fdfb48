"""cmmerge.models"""
