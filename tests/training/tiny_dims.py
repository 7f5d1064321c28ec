"""Architecture dims small enough for a test to train every architecture in seconds."""

TINY_DIMS = {
    "musicnn": {"timbral_filters": 4, "temporal_filters": 4, "midend_filters": 8, "embedding_dim": 16},
    "convgruformer": {"conv_channels": [4, 8, 8], "d_model": 16, "heads": 2, "layers": 1, "ff": 32},
    "resnet_va": {"widths": [4, 8, 8, 16]},
    "lstm_va": {"hidden": 16},
    "resnet18": {"widths": [4, 8, 8, 16], "blocks": [1, 1, 1, 1]},
    "separable_student": {"widths": [4, 8, 8, 8], "blocks": [1, 1, 1], "hidden": 16},
}
