"""The report's cards as `wandb.Image`s with their detections in wandb's box format (class labels from the
detector's vocabulary), for the predictions table an evaluation logs."""

from __future__ import annotations

from PIL import Image

from lxmert_pl.report.cards import Card

WANDB_LONG_SIDE = 256  # the picture logged per card, long side in pixels (boxes are relative: any size works)


def wandb_box_data(card: Card, max_boxes: int) -> tuple[list[dict], dict[int, str]]:
    """wandb `box_data` (relative coordinates) and `class_labels` of a card's most confident boxes."""
    det = card.detections
    width, height = det.image.size
    boxes, labels = [], {}
    for box, class_id, caption, conf, name in list(zip(det.boxes, det.object_ids, det.labels, det.confidences,
                                                       det.class_names))[:max_boxes]:
        x1, y1, x2, y2 = (float(v) for v in box)
        boxes.append({
            "position": {"minX": max(0.0, x1 / width), "maxX": min(1.0, x2 / width),
                         "minY": max(0.0, y1 / height), "maxY": min(1.0, y2 / height)},
            "class_id": int(class_id), "box_caption": caption, "scores": {"confidence": float(conf)},
        })
        labels[int(class_id)] = name
    return boxes, labels


def wandb_card_images(cards: dict[int, Card], limit: int, max_boxes: int = 10) -> dict[int, object]:
    """{row position: wandb.Image with boxes} for the cards among the first `limit` rows."""
    import wandb

    images = {}
    for position, card in cards.items():
        if position >= limit or card.detections is None:
            continue
        picture = card.detections.image.copy()
        picture.thumbnail((WANDB_LONG_SIDE, WANDB_LONG_SIDE), Image.LANCZOS)
        box_data, class_labels = wandb_box_data(card, max_boxes)
        images[position] = wandb.Image(picture, caption=str(card.row.get("sent", "")),
                                       boxes={"detections": {"box_data": box_data, "class_labels": class_labels}})
    return images
