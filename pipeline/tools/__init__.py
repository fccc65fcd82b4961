"""Commands that are not DVC stages: predict, serve, label (the labelling page), profile. Like
the stages, each imports the core and never another command."""
