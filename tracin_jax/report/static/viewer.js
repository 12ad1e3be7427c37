/**
 * The report's volume viewer: NiiVue on the volumes that a page embeds.
 *
 * Each `<script type="application/json" class="viewer-data" id="<id>-data">` block of the page
 * (written by tracin_jax/report/viewer.py) describes one viewer: its volumes as base64
 * gzip-compressed NIfTI-1 files, each with its kind ("image", "labels" or "overlay"), name,
 * colormap, opacity and display range, and the label classes with their colours. The viewer is
 * drawn into the section `<id>`: its canvas, controls (background modality, label maps, heat
 * map, opacity, view, slice) and a readout of the values at the crosshair. Every string from
 * the data reaches the page as text (textContent), never as markup or code. NiiVue cannot
 * fetch files from file://, so the volumes are loaded from memory (NVImage.loadFromBase64).
 *
 * The section's `data-state` says where it stands: loading, ready, no-webgl2 or error; and
 * `window.tracinViewers[id]` holds each viewer's NiiVue instance and controls (for tests).
 * A classic script (module scripts do not load from file://), after niivue.umd.js.
 */
(function () {
  'use strict';

  const VIEWS = [['axial', 0], ['coronal', 1], ['sagittal', 2], ['multiplanar', 3]];
  const NO_WEBGL2 = 'This browser has no WebGL2, so the interactive viewer is off; ' +
      'the figures on this page show the same image.';

  function element(tag, props, text) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    if (text !== undefined) {
      node.textContent = text;
    }
    return node;
  }

  function labelled(text, control) {
    const label = element('label', {}, text + ' ');
    label.appendChild(control);
    return label;
  }

  function select(options, chosen) {
    const node = element('select');
    options.forEach(function (text, k) {
      node.appendChild(element('option', {value: String(k), selected: k === chosen}, text));
    });
    return node;
  }

  function hasWebGL2() {
    try {
      return Boolean(document.createElement('canvas').getContext('webgl2'));
    } catch (err) {
      return false;
    }
  }

  /** NiiVue's label colormap of the classes: 0 transparent, each class in its colour. */
  function labelColormap(labels) {
    const cm = {R: [0], G: [0], B: [0], A: [0], I: [0], labels: ['']};
    labels.forEach(function (label) {
      cm.R.push(label.rgb[0]);
      cm.G.push(label.rgb[1]);
      cm.B.push(label.rgb[2]);
      cm.A.push(255);
      cm.I.push(label.index);
      cm.labels.push(label.name);
    });
    return cm;
  }

  function number(value) {
    if (!Number.isFinite(value)) {
      return String(value);
    }
    const size = Math.abs(value);
    return size !== 0 && (size < 0.01 || size >= 1e4) ? value.toExponential(2) :
        String(Number(value.toFixed(3)));
  }

  /** transform (4 x 4, rows) applied to the point p (3). */
  function apply(transform, p) {
    return [0, 1, 2].map(function (r) {
      const row = transform[r];
      return row[0] * p[0] + row[1] * p[1] + row[2] * p[2] + row[3];
    });
  }

  async function loadVolume(spec, k, labels) {
    const image = await niivue.NVImage.loadFromBase64({
      base64: spec.nifti, name: 'volume' + k + '.nii.gz', colormap: spec.colormap || 'gray',
      opacity: spec.opacity, cal_min: spec.display[0], cal_max: spec.display[1]});
    if (spec.kind === 'labels') {
      image.setColormapLabel(labelColormap(labels));
    }
    image.cal_min = spec.display[0];
    image.cal_max = spec.display[1];
    return image;
  }

  /** The viewer of one data block; resolves when its volumes are drawn. */
  async function start(id, section, data) {
    const stage = section.querySelector('.viewer-stage');
    const canvas = stage.querySelector('canvas');
    const status = section.querySelector('.viewer-status');
    const readout = section.querySelector('.viewer-readout');
    const controls = section.querySelector('.viewer-controls');

    function off(state, message) {
      section.dataset.state = state;
      stage.classList.add('off');
      stage.replaceChildren(element('p', {className: 'note'}, message));
      controls.replaceChildren();
      status.textContent = '';
    }

    if (!hasWebGL2()) {
      off('no-webgl2', NO_WEBGL2);
      return null;
    }
    if (typeof niivue === 'undefined') {
      off('error', 'The viewer\'s script (static/niivue.umd.js) did not load.');
      return null;
    }
    const nv = new niivue.Niivue({
      backColor: [0, 0, 0, 1], crosshairColor: [0.35, 0.75, 1, 0.8], crosshairWidth: 0.4,
      crosshairWidthUnit: 'percent', isNearestInterpolation: true, isColorbar: false,
      dragAndDropEnabled: false, loadingText: '', logLevel: 'warn', sliceType: 0,
      multiplanarShowRender: niivue.SHOW_RENDER.NEVER,
      isOrientationTextVisible: data.orientation !== false});
    await nv.attachToCanvas(canvas);
    const specs = data.volumes;
    const images = await Promise.all(specs.map(function (spec, k) {
      return loadVolume(spec, k, data.labels);
    }));
    const byImage = new Map(images.map(function (image, k) { return [image, specs[k]]; }));
    const kinds = {image: [], labels: [], overlay: []};
    specs.forEach(function (spec, k) { kinds[spec.kind].push(k); });
    const state = {
      background: Math.max(0, kinds.image.findIndex(function (k) { return specs[k].visible; })),
      labels: kinds.labels.map(function (k) { return specs[k].visible; }),
      heat: kinds.overlay.findIndex(function (k) { return specs[k].visible; }),
      opacity: null,
      view: 0,
    };
    // The volumes' own opacities until the opacity control is moved; then its value for all.
    const firstShown = kinds.labels.concat(kinds.overlay).find(function (k) {
      return specs[k].visible;
    });
    const initialOpacity = firstShown === undefined ? 0.6 : specs[firstShown].opacity;

    function wanted() {
      const shown = [images[kinds.image[state.background]]];
      kinds.labels.forEach(function (k, j) {
        if (state.labels[j]) {
          shown.push(images[k]);
        }
      });
      if (state.heat >= 0) {
        shown.push(images[kinds.overlay[state.heat]]);
      }
      return shown;
    }

    /** Puts the wanted volumes in NiiVue, background first, and removes the others. */
    function compose() {
      const shown = wanted();
      shown.forEach(function (image, k) {
        if (!nv.volumes.includes(image)) {
          nv.addVolume(image);
        }
        nv.setVolume(image, k);
      });
      nv.volumes.slice().forEach(function (image) {
        if (!shown.includes(image)) {
          nv.removeVolume(image);
        }
      });
      shown.forEach(function (image, k) {
        image.opacity = k === 0 || state.opacity === null ? byImage.get(image).opacity :
            state.opacity;
      });
      nv.updateGLVolume();
      nv.drawScene();
      nv.createOnLocationChange();
    }

    const sliceInput = element('input', {type: 'range', min: '0', step: '1', value: '0'});
    const sliceText = element('span', {className: 'viewer-slice'});

    /** The crosshair in the voxels of the background shown, as its file stores them. */
    function crosshairVoxel() {
      const mm = nv.frac2mm(nv.scene.crosshairPos, 0, true);
      return apply(byImage.get(nv.back).inverse, mm).map(Math.round);
    }

    /** Moves the crosshair to slice z (third axis) of the background shown. */
    function moveToSlice(z) {
      const spec = byImage.get(nv.back);
      const voxel = crosshairVoxel();
      voxel[2] = Math.min(Math.max(z, 0), spec.shape[2] - 1);
      nv.scene.crosshairPos = nv.mm2frac(apply(spec.affine, voxel), 0, true);
      nv.drawScene();
      nv.createOnLocationChange();
    }

    function showLocation(location) {
      const spec = byImage.get(nv.back);
      const voxel = apply(spec.inverse, location.mm).map(Math.round);
      const z = voxel[2];
      const depth = spec.shape[2];
      sliceInput.max = String(depth - 1);
      sliceInput.value = String(z);
      const sliceNames = data.sliceNames;  // the first image's: for the backgrounds of its depth
      const name = sliceNames && sliceNames.length === depth ? ' (' + sliceNames[z] + ')' : '';
      sliceText.textContent = 'slice ' + (z + 1) + ' of ' + depth + name;
      const parts = ['voxel ' + voxel.join(', ')];
      location.values.forEach(function (entry, k) {
        const spec = byImage.get(nv.volumes[k]);
        if (!spec) {
          return;
        }
        let text = number(entry.value);
        if (spec.kind === 'labels') {
          const index = Math.round(entry.value);
          const label = data.labels.find(function (l) { return l.index === index; });
          text = label ? label.name : 'none';
        }
        parts.push(spec.name + ' = ' + text);
      });
      readout.textContent = 'At the crosshair (click to move it): ' + parts.join(' · ');
    }

    // The controls, each showing its part of `state` (sync) and changing it through `api`.
    const names = kinds.image.map(function (k) { return specs[k].name; });
    const inputs = {background: select(names, state.background), labels: [], heat: null,
                    opacity: null, view: select(VIEWS.map(function (v) { return v[0]; }), 0)};

    function sync() {
      inputs.background.value = String(state.background);
      inputs.labels.forEach(function (box, j) { box.checked = state.labels[j]; });
      if (inputs.heat) {
        inputs.heat.value = String(state.heat + 1);
      }
      if (inputs.opacity) {
        inputs.opacity.value = String(state.opacity === null ? initialOpacity : state.opacity);
      }
      inputs.view.value = String(state.view);
    }

    function change(update) {
      return function () {
        update.apply(null, arguments);
        compose();
        sync();
      };
    }

    const api = {
      nv: nv, state: state, ready: false,
      slice: function () { return crosshairVoxel()[2]; },
      setBackground: change(function (k) { state.background = k; }),
      setLabels: change(function (j, on) { state.labels[j] = on; }),
      setHeat: change(function (k) { state.heat = k; }),
      setOpacity: change(function (value) { state.opacity = value; }),
      setView: function (k) {
        state.view = k;
        nv.setSliceType(VIEWS[k][1]);
        sync();
      },
      setSlice: moveToSlice,
    };

    inputs.background.className = 'viewer-background';
    inputs.background.addEventListener('change', function () {
      api.setBackground(Number(inputs.background.value));
    });
    controls.appendChild(labelled('Background', inputs.background));
    kinds.labels.forEach(function (k, j) {
      const box = element('input', {type: 'checkbox', className: 'viewer-labels'});
      box.addEventListener('change', function () { api.setLabels(j, box.checked); });
      inputs.labels.push(box);
      const label = element('label');
      label.append(box, ' ' + specs[k].name);
      controls.appendChild(label);
    });
    if (kinds.overlay.length) {
      inputs.heat = select(['none'].concat(kinds.overlay.map(function (k) {
        return specs[k].name;
      })), state.heat + 1);
      inputs.heat.className = 'viewer-heat';
      inputs.heat.addEventListener('change', function () {
        api.setHeat(Number(inputs.heat.value) - 1);
      });
      controls.appendChild(labelled('Heat map', inputs.heat));
    }
    if (kinds.labels.length || kinds.overlay.length) {
      inputs.opacity = element('input', {type: 'range', min: '0', max: '1', step: '0.05',
                                         className: 'viewer-opacity'});
      inputs.opacity.addEventListener('input', function () {
        api.setOpacity(Number(inputs.opacity.value));
      });
      controls.appendChild(labelled('Opacity', inputs.opacity));
    }
    inputs.view.className = 'viewer-view';
    inputs.view.addEventListener('change', function () { api.setView(Number(inputs.view.value)); });
    controls.appendChild(labelled('View', inputs.view));
    sliceInput.className = 'viewer-slice-input';
    sliceInput.addEventListener('input', function () { api.setSlice(Number(sliceInput.value)); });
    controls.appendChild(labelled('Axial slice', sliceInput));
    controls.appendChild(sliceText);
    sync();

    nv.onLocationChange = showLocation;
    compose();
    if (data.focusMM) {
      nv.scene.crosshairPos = nv.mm2frac(data.focusMM, 0, true);
    }
    nv.drawScene();
    nv.createOnLocationChange();
    status.textContent = 'Click to move the crosshair, scroll for the next slice, ' +
        'right-drag to change the contrast.';
    api.ready = true;
    window.tracinViewers[id] = api;
    section.dataset.state = 'ready';
    return api;
  }

  function startAll() {
    window.tracinViewers = window.tracinViewers || {};
    document.querySelectorAll('script.viewer-data').forEach(function (block) {
      const id = block.id.replace(/-data$/, '');
      const section = document.getElementById(id);
      if (!section) {
        return;
      }
      let data;
      try {
        data = JSON.parse(block.textContent);
      } catch (err) {
        section.dataset.state = 'error';
        return;
      }
      start(id, section, data).catch(function (err) {
        section.dataset.state = 'error';
        section.querySelector('.viewer-stage').replaceChildren(element(
            'p', {className: 'note'}, 'The viewer could not show its volumes: ' + err));
      });
    });
  }

  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', startAll);
  } else {
    startAll();
  }
})();
