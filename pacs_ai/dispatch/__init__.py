"""pacs_ai.dispatch"""
