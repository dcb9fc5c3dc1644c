"""Input pipelines (ImageNet folder layout) and the generated demo dataset."""
