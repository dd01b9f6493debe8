"""Using a trained run: rebuilding it (:mod:`~nin.inference.trained`), evaluating it, classifying image
files, class activation maps, and export to ONNX, TorchScript and Keras.
"""
