"""Draft slide reports: ``report.json`` (versioned schema), Markdown, HTML and PDF, and the
batch index. Submodules: ``params`` (config), ``data`` (stored findings, report dict),
``images``, ``markdown``, ``html``, ``pdf``, ``index``, ``build`` (the stage)."""
