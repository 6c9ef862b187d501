"""pacs_ai.index"""
