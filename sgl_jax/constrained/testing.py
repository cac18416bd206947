"""Example constraints shared by the tests and the benchmarks (plain data, no jax)."""

# A user record: 10 fields, a nested object, an array, enums, a date format, integer ranges and a pattern.
# The structured-generation benchmark decodes it; the end-to-end test sends it through the server.
USER_SCHEMA = {
    "type": "object",
    "properties": {
        "user_id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "full_name": {"type": "string", "maxLength": 32},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer", "guest"]},
        "is_active": {"type": "boolean"},
        "date_joined": {"type": "string", "format": "date"},
        "home_address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 32},
                "city": {"type": "string", "maxLength": 20},
                "postal_code": {"type": "string", "pattern": "[0-9]{5}"},
            },
            "required": ["street", "city", "postal_code"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "country": {"enum": ["USA", "Canada", "Mexico", "UK", "France", "Germany"]},
    },
    "required": ["user_id", "full_name", "age", "role", "is_active", "date_joined", "home_address", "tags",
                 "rating", "country"],
    "additionalProperties": False,
}
