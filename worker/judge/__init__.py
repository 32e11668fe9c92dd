"""Pure judgment logic: answers to verdicts, manifest documents, image header checks; no I/O imports."""
