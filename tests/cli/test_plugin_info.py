"""What `dare-pipeline plugins` says about a plugin: its description line and its conflicts."""

from typing import ClassVar

from dare_pipeline.cli.commands import conflicts, description
from dare_pipeline.core import Plugin


class Documented(Plugin):
    """First line of the class docstring.

    More detail that the listing leaves out."""

    name = "documented"
    conflicts: ClassVar[dict[str, str]] = {"undocumented": "they fight"}


class Undocumented(Plugin):
    name = "undocumented"


class Inheriting(Documented):
    name = "inheriting"


def test_description_is_the_first_line_of_the_class_docstring():
    assert description(Documented) == "First line of the class docstring."


def test_without_a_class_docstring_the_module_docstring_is_used():
    assert description(Undocumented) == description(Inheriting) == (
        "What `dare-pipeline plugins` says about a plugin: its description line and its conflicts.")


def test_conflicts_are_those_declared_and_those_declared_against_it():
    classes = {"documented": Documented, "undocumented": Undocumented, "inheriting": Inheriting}
    assert conflicts("documented", classes) == {"undocumented": "they fight"}
    assert conflicts("undocumented", classes) == {"documented": "they fight", "inheriting": "they fight"}
