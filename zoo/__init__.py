"""What a model and its data are: the lowest layer (docs/architecture.md), importing neither MLflow nor another
package of the project; importing it loads nothing (the CLI starts without torch)."""
