"""Data stages on Ray: download, embed, reorder, and the streaming loaders."""
