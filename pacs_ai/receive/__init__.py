"""pacs_ai.receive"""
