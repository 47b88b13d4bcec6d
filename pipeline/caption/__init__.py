"""`pipeline caption`: new image files -> sentences (the encoder rebuilt from the checkpoint's record)."""
