"""The edge: results in, text, pictures and run folders out. Nothing here measures anything."""
