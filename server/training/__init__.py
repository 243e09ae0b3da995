"""Training: model specs, Keras models, the trainer and the background job runner."""
