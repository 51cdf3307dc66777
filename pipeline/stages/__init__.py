"""The data stages, one module or package each: split, download, embed, reorder, filter, holdout."""
