"""The stages: one module per command. A stage imports the core (pipeline.*) and never another stage."""
