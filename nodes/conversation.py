"""Conversation nodes shared by GILL's dialogue and the Beyond CLIP router: draw a reply's pictures back into the
conversation, show it, save it to a file and load it again."""
import re
from pathlib import Path

import folder_paths

from ..bridges.conversation import Conversation
from ..bridges.errors import InputError
from ..loaders import conversations as files
from ..loaders import folders
from .common import CATEGORY, CONVERSATION_TYPE, execution_blocker, placeholder_image, ui_text

CATEGORY = CATEGORY + "/conversation"
_NAME = re.compile(r"^[\w.\- ]+$")


def _conversation(value):
    if not isinstance(value, Conversation):
        raise InputError(f"the conversation input carries a {type(value).__name__}, not a conversation")
    return value


class ReplyPictures:
    """The pictures of the last reply: the retrieved ones it holds, and the generated ones the sampler drew (lazily:
    asked for only when the reply has pictures to generate)."""

    INPUT_IS_LIST = True  # one conversation, and the list of pictures the sampler drew for it

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"conversation": (CONVERSATION_TYPE, {"tooltip": "From GILL Dialogue or the router"})},
            "optional": {"generated": ("IMAGE", {"lazy": True, "tooltip": "VAE Decode of the sampler fed by the "
                                                                        "reply's conditioning (one per picture)"})},
        }

    RETURN_TYPES = (CONVERSATION_TYPE, "IMAGE")
    RETURN_NAMES = ("conversation", "pictures")
    OUTPUT_IS_LIST = (False, True)
    FUNCTION = "attach"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Puts the pictures the sampler drew for the last reply into the conversation (so the next GILL "
                   "turn sees them as pictures) and outputs all of the reply's pictures, retrieved and generated, "
                   "in order. The sampler branch is asked for only when the reply has a picture to generate.")

    def check_lazy_status(self, conversation, generated=None):
        waiting = _conversation(conversation[0]).pending()
        if waiting and (generated is None or all(g is None for g in generated)):
            return ["generated"]
        return []

    def attach(self, conversation, generated=None):
        conv = _conversation(conversation[0])
        drawn = [g for g in (generated or []) if g is not None]
        if conv.pending():
            if not drawn:
                raise InputError("the reply has pictures to generate but 'generated' is not connected: connect the "
                                 "VAE Decode of the KSampler that samples the reply's conditioning")
            # one picture per conditioning: the first of each batch
            conv = conv.with_generated([image[0] for image in drawn])
        reply = conv.turns[-1].pictures if conv.turns else []
        pictures = [p.image[None] for p in reply if not p.pending]
        if not pictures:
            blocked = execution_blocker()
            # nothing to show: skip what follows, or (hosts that run every branch) a black placeholder
            pictures = [blocked] if blocked is not None else [placeholder_image()]
        text = f"{len(reply)} picture(s) in the reply" if reply else "no picture in the reply"
        return ui_text(text, conv, pictures)


class ShowConversation:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conversation": (CONVERSATION_TYPE,)}}

    RETURN_TYPES = (CONVERSATION_TYPE,)
    RETURN_NAMES = ("conversation",)
    OUTPUT_NODE = True
    FUNCTION = "show"
    CATEGORY = CATEGORY
    DESCRIPTION = "Shows the conversation as text on the node (pictures as [picture: ...]) and passes it on."

    def show(self, conversation):
        conv = _conversation(conversation)
        return ui_text(conv.show(), conv)


def _output_folder() -> Path:
    return Path(folder_paths.get_output_directory()) / files.FOLDER


def _choices():
    return [label for label, _ in files.conversation_files(
        [("output", _output_folder()), ("input", folder_paths.get_input_directory())])]


def _resolve(choice) -> Path:
    for label, path in files.conversation_files(
            [("output", _output_folder()), ("input", folder_paths.get_input_directory())]):
        if label == choice:
            return path
    raise InputError(folders.not_found_message("conversation file", choice, _choices(),
                                               f"output/{files.FOLDER} or the input folder"))


class SaveConversation:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conversation": (CONVERSATION_TYPE,),
            "name": ("STRING", {"default": "conversation",
                                "tooltip": f"Written as output/{files.FOLDER}/<name>{files.SUFFIX} (a conversation "
                                           f"saved under the same name before is replaced)"}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Saves the conversation (its words and pictures, in one JSON file) to output/"
                   f"{files.FOLDER}; Load Conversation reads it back.")

    def save(self, conversation, name):
        name = name.strip()
        if not _NAME.match(name) or name.startswith("."):
            raise InputError(f"name {name!r}: use letters, digits, spaces, '.', '-' or '_' only")
        path = files.save_conversation(_output_folder() / (name + files.SUFFIX), _conversation(conversation))
        return ui_text(f"saved {path.name}: {len(conversation)} turn(s)", str(path))


class LoadConversation:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conversation_file": (_choices(), {
            "tooltip": f"A {files.SUFFIX} file in output/{files.FOLDER} (Save Conversation) or in the input folder"})}}

    RETURN_TYPES = (CONVERSATION_TYPE,)
    RETURN_NAMES = ("conversation",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a conversation saved by Save Conversation, to go on with it."

    @classmethod
    def VALIDATE_INPUTS(cls, conversation_file):
        choices = _choices()
        if conversation_file not in choices:
            return folders.not_found_message("conversation file", conversation_file, choices,
                                             f"output/{files.FOLDER} or the input folder")
        return True

    @classmethod
    def IS_CHANGED(cls, conversation_file):
        try:
            st = _resolve(conversation_file).stat()
        except (InputError, OSError):
            return ""
        return f"{st.st_size}:{st.st_mtime_ns}"

    def load(self, conversation_file):
        conv = files.read_conversation(_resolve(conversation_file))
        return ui_text(conv.show(), conv)


NODE_CLASS_MAPPINGS = {
    "BeyondCLIP_ReplyPictures": ReplyPictures,
    "BeyondCLIP_ShowConversation": ShowConversation,
    "BeyondCLIP_SaveConversation": SaveConversation,
    "BeyondCLIP_LoadConversation": LoadConversation,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "BeyondCLIP_ReplyPictures": "Reply Pictures (conversation)",
    "BeyondCLIP_ShowConversation": "Show Conversation",
    "BeyondCLIP_SaveConversation": "Save Conversation",
    "BeyondCLIP_LoadConversation": "Load Conversation",
}
