"""What a process settles before TensorFlow is imported: its rank variables (``rankenv``), its
preset applied (``bootstrap``), ITEX on demand (``itex``) and the software stack (``versions``)."""
