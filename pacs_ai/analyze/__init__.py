"""pacs_ai.analyze"""
