"""What the user gives: the spec (validated once), the components it names, the built-ins."""
