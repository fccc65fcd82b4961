"""The data wing: what makes and streams samples (seeds, the `captcha` and `mixed` styles, image
decoding, shards + manifest, sources, labelled folders). It never imports the model wing, so a
model change never reruns the data stages."""
