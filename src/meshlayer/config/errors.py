"""Config errors name the document, the field path and the problem."""


class ConfigError(Exception):
    """A config document is invalid.

    ``document`` names the document (``file.yaml#2 (Service/catalog)``), ``field``
    is a dotted path inside it (``spec.endpoints[1].address``).
    """

    def __init__(self, document: str, field: str, problem: str) -> None:
        self.document = document
        self.field = field
        self.problem = problem
        where = f"{document}: {field}" if field else document
        super().__init__(f"{where}: {problem}")
