"""Training-free compression: functions that rewrite a loaded model's weights (model -> model)."""
