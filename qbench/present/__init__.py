"""What a user reads: the comparison table, the report (markdown and HTML, with charts),
and the comparison of two runs. Imports analyze and below; nothing imports it but
the workflows, the API and the CLI."""
