"""Input pipelines: tfds ArrayRecord and built-in digits sources through grain (`pipeline`), the
resize / crop / normalisation that training and inference share (`transforms`), and timm's
augmentation recipe on PIL (`augment`).
"""
