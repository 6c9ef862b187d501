"""pacs_ai.route"""
