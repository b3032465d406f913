"""The evidence: `rpo reproduce` runs the comparison jobs (`reproduce`), builds the record from their metrics
(`results`, `statistics`), renders its tables, page and plots (`results_tables`, `results_doc`, `plots`,
`formatting`), and the repair-rate measurement (`repair`).
"""
