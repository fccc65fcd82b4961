"""captcha-crnn: train and serve CRNN captcha recognizers as a DVC pipeline."""
