"""Growth maths: widening operators, budgets and selection, SSD splitting, Firefly scoring."""
