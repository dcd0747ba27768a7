"""The live window: a vispy SceneCanvas drawing what a :class:`ViewState` holds.

Layout (a grid)::

    header: run, scan, fill, detector
    [mean diffraction pattern + regions] [virtual image 0 + overlay] [virtual image 1] ...
    [3D view: lines coloured by depth in the foil box, axes, particles]  [dislocations, velocities]
    status: frames/s, GB/s, dropped, latency

:meth:`LiveWindow.update` (called as soon as something new arrived, at most ~20 times a
second, see ``livestereo.view.app.RedrawPacer``) pulls what changed from the model and only
uploads it: RGBA textures for the images (already composed and at most 512 px in the
client thread), vertex buffers for the 3D lines, label text. The grid is rebuilt only when
the number of images changes.

Import this module only after the vispy app backend is chosen (see ``livestereo.view.app``).
"""

from __future__ import annotations

import numpy as np
from vispy import scene
from vispy.scene import visuals

from livestereo.view.model import Panel, Scene3D, ViewState

BG = (0.06, 0.06, 0.08, 1.0)
TEXT = (0.9, 0.9, 0.9, 1.0)
BOX_COLOR = (0.55, 0.55, 0.6, 1.0)
AXIS_COLORS = ((1.0, 0.3, 0.3, 1.0), (0.3, 1.0, 0.3, 1.0), (0.35, 0.55, 1.0, 1.0))
CRYSTAL_COLOR = (1.0, 0.75, 0.2, 1.0)
MAX_PANELS_PER_ROW = 4
HEADER_H, STATUS_H, LABEL_H, INFO_W = 24, 22, 18, 340


class _Label(scene.Label):
    """A Label that honours anchor_x="left" and anchor_y="bottom" (text below its top edge); vispy's centres it."""

    def __init__(self, text, parent=None, **kwargs):
        super().__init__(text, **kwargs)
        if parent is not None:
            self.parent = parent

    def _set_pos(self):
        r = self.rect
        t = self._text_visual
        x = r.left + 4 if t.anchors[0] == "left" else r.center[0]
        y = r.bottom + 4 if t.anchors[1] == "bottom" else r.center[1]
        t.pos = (x, y)


def _rgb(c) -> tuple[float, float, float, float]:
    return (c[0] / 255, c[1] / 255, c[2] / 255, 1.0)


class _ImagePanel:
    """A title label over a ViewBox holding one RGBA image (y down, aspect 1)."""

    def __init__(self, root, title: str, color):
        self.label = _Label(title, color=color, font_size=9, parent=root)
        self.view = scene.widgets.ViewBox(parent=root, border_color=(0.3, 0.3, 0.35, 1.0))
        self.view.camera = scene.PanZoomCamera(aspect=1)
        self.view.camera.flip = (False, True, False)
        self.image = visuals.Image(np.zeros((2, 2, 4), np.uint8), parent=self.view.scene, interpolation="nearest")
        self.shape: tuple[int, int] | None = None

    def place(self, x: float, y: float, w: float, h: float) -> None:
        self.label.pos, self.label.size = (x, y), (w, LABEL_H)
        self.view.pos, self.view.size = (x, y + LABEL_H), (w, max(1.0, h - LABEL_H))

    def set_rgba(self, rgba: np.ndarray, title: str | None = None, color=None) -> None:
        self.image.set_data(rgba)
        if self.shape != rgba.shape[:2]:
            self.shape = rgba.shape[:2]
            h, w = self.shape
            self.view.camera.set_range(x=(0, w), y=(0, h), margin=0.0)
        if title is not None and self.label.text != title:
            self.label.text = title
        if color is not None:
            self.label._text_visual.color = color
        self.image.update()


class LiveWindow:
    """The canvas and its visuals; ``update()`` brings them up to date with ``state``."""

    def __init__(self, state: ViewState, size: tuple[int, int] = (1280, 800), show: bool = False,
                 title: str = "livestereo live"):
        self.state = state
        self.canvas = scene.SceneCanvas(size=size, bgcolor=BG, show=show, title=title, keys="interactive")
        self._seen: dict[str, int] = {}
        self._layout_key: tuple | None = None
        self._status = ""
        self.root = None
        self.pattern_panel: _ImagePanel | None = None
        self.panels: list[_ImagePanel] = []
        self.updates = 0
        self._build((False, 0))
        self.canvas.events.resize.connect(lambda event: self._layout())

    # -- layout

    def _build(self, key: tuple[bool, int]) -> None:
        has_pattern, n = key
        if self.root is not None:
            self.root.parent = None
        self._layout_key = key
        self.root = root = scene.Widget(parent=self.canvas.central_widget)
        self.header = _Label("", color=TEXT, font_size=10, anchor_x="left", parent=root)
        self.pattern_panel = _ImagePanel(root, "mean diffraction pattern", TEXT) if has_pattern else None
        self.panels = [_ImagePanel(root, "", TEXT) for _ in range(n)]
        self.waiting = _Label("waiting for images..." if not n else "", color=(0.6, 0.6, 0.6, 1), font_size=10,
                              parent=root)
        self.view3d = scene.widgets.ViewBox(parent=root, border_color=(0.3, 0.3, 0.35, 1.0))
        self.view3d.camera = scene.TurntableCamera(fov=35, elevation=28, azimuth=-55)
        # (canvas y runs down: anchor "bottom" hangs the text block below its top-left corner)
        self.info = _Label("", color=TEXT, font_size=9, anchor_x="left", anchor_y="bottom", parent=root)
        self.status = _Label("", color=(0.75, 0.85, 0.75, 1.0), font_size=9, anchor_x="left", parent=root)
        self._make_3d()
        self._layout()
        # everything is new: draw it all on the next update
        self._seen.clear()

    def _layout(self) -> None:
        W, H = (float(v) for v in self.canvas.size)
        self.root.pos, self.root.size = (0, 0), (W, H)
        self.header.pos, self.header.size = (0, 0), (W, HEADER_H)
        self.status.pos, self.status.size = (0, H - STATUS_H), (W, STATUS_H)
        body = H - HEADER_H - STATUS_H
        cells = ([self.pattern_panel] if self.pattern_panel is not None else []) + self.panels
        n_rows = max(1, -(-len(cells) // MAX_PANELS_PER_ROW))
        per_row = max(1, min(MAX_PANELS_PER_ROW, len(cells)))
        img_h = body * (0.5 if n_rows == 1 else 0.6)
        cw, ch = W / per_row, img_h / n_rows
        for i, cell in enumerate(cells):
            r, c = divmod(i, per_row)
            cell.place(c * cw + 2, HEADER_H + r * ch, cw - 4, ch - 2)
        self.waiting.pos, self.waiting.size = (0, HEADER_H), (W, img_h)
        y3 = HEADER_H + img_h + 2
        info_w = min(INFO_W, 0.35 * W)
        self.view3d.pos, self.view3d.size = (2, y3), (max(1.0, W - info_w - 6), max(1.0, body - img_h - 4))
        self.info.pos, self.info.size = (W - info_w, y3), (info_w, max(1.0, body - img_h - 4))

    def _make_3d(self) -> None:
        s = self.view3d.scene
        self.box = visuals.Line(np.zeros((2, 3), np.float32), color=BOX_COLOR, connect="segments", parent=s, method="gl")
        self.axes = visuals.Line(np.zeros((2, 3), np.float32), connect="segments", parent=s, width=2, method="gl")
        self.axis_labels = visuals.Text(["x", "y", "z"], pos=np.zeros((3, 3)), color=list(AXIS_COLORS), font_size=10,
                                        parent=s)
        self.crystal = visuals.Line(np.zeros((2, 3), np.float32), color=CRYSTAL_COLOR, connect="segments", parent=s,
                                    width=2, method="gl")
        self.crystal_labels = visuals.Text(["[100]", "[010]", "[001]"], pos=np.zeros((3, 3)), color=CRYSTAL_COLOR,
                                           font_size=8, parent=s)
        self.crystal.visible = self.crystal_labels.visible = False
        self.lines = visuals.Line(np.zeros((2, 3), np.float32), connect="segments", parent=s, width=3, method="gl")
        self.lines.visible = False
        self.markers = visuals.Markers(parent=s, scaling="scene")
        self.markers.visible = False
        self._box_key = None
        self._set_box(np.array([0.0, 0.0, -50.0]), np.array([256.0, 256.0, 50.0]), None)

    def _set_box(self, lo: np.ndarray, hi: np.ndarray, crystal_axes: np.ndarray | None) -> None:
        key = (tuple(np.round(lo, 3)), tuple(np.round(hi, 3)), None if crystal_axes is None else crystal_axes.tobytes())
        if key == self._box_key:
            return
        self._box_key = key
        c = np.array([[lo[0], lo[1], lo[2]], [hi[0], lo[1], lo[2]], [hi[0], hi[1], lo[2]], [lo[0], hi[1], lo[2]],
                      [lo[0], lo[1], hi[2]], [hi[0], lo[1], hi[2]], [hi[0], hi[1], hi[2]], [lo[0], hi[1], hi[2]]], np.float32)
        edges = [(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7)]
        self.box.set_data(pos=c[np.array(edges).reshape(-1)], color=BOX_COLOR)
        ext = hi - lo
        length = 0.22 * float(max(ext[0], ext[1]))
        o = np.array([lo[0], lo[1], hi[2]], np.float32) - np.array([0.08, 0.08, 0.0], np.float32) * ext[:2].max()
        ends = o + np.eye(3, dtype=np.float32) * length
        pos = np.stack([o, ends[0], o, ends[1], o, ends[2]])
        col = np.repeat(np.array(AXIS_COLORS, np.float32), 2, axis=0)
        self.axes.set_data(pos=pos, color=col)
        self.axis_labels.pos = o + np.eye(3) * length * 1.15
        if crystal_axes is not None:
            cc = np.array([hi[0], hi[1], hi[2]], np.float32) + np.array([0.1, 0.1, 0.0], np.float32) * ext[:2].max()
            ends = cc + crystal_axes.astype(np.float32) * length
            self.crystal.set_data(pos=np.stack([cc, ends[0], cc, ends[1], cc, ends[2]]), color=CRYSTAL_COLOR)
            self.crystal_labels.pos = cc + crystal_axes * length * 1.2
            self.crystal.visible = self.crystal_labels.visible = True
        else:
            self.crystal.visible = self.crystal_labels.visible = False
        cam = self.view3d.camera
        cam.center = tuple(((lo + hi) / 2).tolist())
        cam.distance = None
        cam.scale_factor = 0.95 * float(np.linalg.norm(ext))

    # -- updates

    def update(self) -> bool:
        """Pull what changed from the model into the visuals; True if anything did."""
        ch = self.state.pull(self._seen)
        panels: list[Panel] | None = ch.get("panels")
        pattern = ch.get("pattern")
        cur_panels = panels if panels is not None else None
        has_pattern = (pattern is not None) or (self.pattern_panel is not None)
        n = len(cur_panels) if cur_panels is not None else len(self.panels)
        if (has_pattern, n) != self._layout_key:
            self._build((has_pattern, n))
            ch = self.state.pull(self._seen)  # everything again, into the new grid
            panels, pattern = ch.get("panels"), ch.get("pattern")
        changed = bool(ch)
        if pattern is not None and self.pattern_panel is not None:
            self.pattern_panel.set_rgba(pattern)
        if panels is not None:
            for p, vis in zip(panels, self.panels):
                vis.set_rgba(p.rgba, p.title, _rgb(p.color))
        sc: Scene3D | None = ch.get("scene")
        if "scene" in ch:
            self._set_scene(sc)
        if "header" in ch:
            self.header.text = ch["header"]
        if "info" in ch:
            self.info.text = ch["info"]
        status = self.state.status_text()
        if status != self._status:
            self._status = status
            self.status.text = status
            changed = True
        if changed:
            self.updates += 1
            self.canvas.update()
        return changed

    def _set_scene(self, sc: Scene3D | None) -> None:
        if sc is None:
            self.lines.visible = self.markers.visible = False
            return
        self._set_box(sc.box_lo, sc.box_hi, sc.crystal_axes)
        if len(sc.line_connect):
            self.lines.set_data(pos=sc.line_pos, color=sc.line_color, connect=sc.line_connect)
            self.lines.visible = True
        else:
            self.lines.visible = False
        if len(sc.particle_pos):
            self.markers.set_data(pos=sc.particle_pos, face_color=sc.particle_color, size=sc.particle_size_nm,
                                  edge_width=0)
            self.markers.visible = True
        else:
            self.markers.visible = False

    # -- rendering and geometry (for snapshots and tests)

    def render(self) -> np.ndarray:
        """The canvas as an RGB uint8 array (h, w, 3), offscreen."""
        return self.canvas.render(alpha=False)

    def widget_rect(self, widget) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of a widget in canvas pixels."""
        tr = widget.node_transform(self.canvas.scene)
        w, h = widget.size
        a = tr.map([0, 0])[:2]
        b = tr.map([w, h])[:2]
        s = self.canvas.pixel_scale
        return int(round(a[0] * s)), int(round(a[1] * s)), int(round(b[0] * s)), int(round(b[1] * s))

    def image_to_canvas(self, panel: int, xy: np.ndarray) -> np.ndarray:
        """Texture pixel coordinates (x = col, y = row) of image panel ``panel`` -> canvas pixels."""
        img = self.panels[panel].image
        tr = img.get_transform("visual", "canvas")
        xy = np.asarray(xy, np.float64).reshape(-1, 2) + 0.5
        return tr.map(xy)[:, :2] * self.canvas.pixel_scale

    def close(self) -> None:
        self.canvas.close()
