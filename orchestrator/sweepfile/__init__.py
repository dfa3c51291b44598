"""The sweep file: its sections (pydantic), YAML loading with one-line errors, the cross-field rules, expansion
into trials and `--set` overrides. Imports neither Ray nor the store."""
