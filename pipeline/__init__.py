"""Show-and-Tell image captioning with a frozen-ResNet feature cache.

Data flows one way:
    dataset files -> manifest + vocabulary + labels (prepare)
                  -> feature cache (extract)
                  -> decoder checkpoint (train)
                  -> captions and metrics (caption, evaluate)
"""

__version__ = "0.1.0"
