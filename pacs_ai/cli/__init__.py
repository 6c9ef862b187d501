"""pacs_ai.cli"""
