"""Built-in models and data sets, small enough for a 2-core CPU.

Names map to ``module:callable`` strings so that the spec can check a name without
importing torch.
"""

BUILTIN_MODELS: dict[str, str] = {
    "mlp": "batchtune.config.builtins.models:mlp",
    "cnn": "batchtune.config.builtins.models:cnn",
    "char_transformer": "batchtune.config.builtins.models:char_transformer",
}

BUILTIN_DATA: dict[str, str] = {
    "synthetic_classification": "batchtune.config.builtins.data:synthetic_classification",
    "digits": "batchtune.config.builtins.data:digits",
    "char_text": "batchtune.config.builtins.data:char_text",
    "text_lines": "batchtune.config.builtins.data:text_lines",
}

BUILTIN_COLLATES: dict[str, str] = {
    "pad_tokens": "batchtune.config.builtins.data:pad_tokens",
}

__all__ = ["BUILTIN_COLLATES", "BUILTIN_DATA", "BUILTIN_MODELS"]
