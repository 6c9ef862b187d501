// Read pacs-ai's SEG and measurement SR as OHIF's libraries do: dcmjs parses both files and
// @cornerstonejs/adapters' MeasurementReport.generateToolState turns the SR's measurement groups into
// Cornerstone annotations.  Usage: node cornerstone_read.mjs SEG SR PLANES_JSON; prints one JSON object.
//
// pacs-ai's measurement groups are TID 1501 groups whose measurements are inferred from an SCOORD on a
// source image; the adapters pick a tool for a group by its Cornerstone tracking identifier or by a
// group-level graphic, which only a detection's TID 1410 region group has (its Image Region: a
// RectangleROI without any hook).  For the others the reader registers the tool the way a viewer does
// for SR content it did not write: through the getToolClass hook, by the graphic type of the
// measurement's SCOORD (POINT -> Probe, POLYLINE -> RectangleROI).
import fs from 'node:fs';
import dcmjs from 'dcmjs';
import { metaData } from '@cornerstonejs/core';
import { adaptersSR } from '@cornerstonejs/adapters';

const [segPath, srPath, planesPath] = process.argv.slice(2);
const { MeasurementReport, Probe, RectangleROI } = adaptersSR.Cornerstone3D;

function read(path) {
  const bytes = fs.readFileSync(path);
  const message = dcmjs.data.DicomMessage.readFile(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length));
  return dcmjs.data.DicomMetaDictionary.naturalizeDataset(message.dict);
}

const asArray = (value) => (value === undefined ? [] : Array.isArray(value) ? value : [value]);

// Image planes of the source images (imageId = SOP Instance UID), for image -> patient coordinates.
const planes = JSON.parse(fs.readFileSync(planesPath, 'utf8'));
metaData.addProvider((type, imageId) => {
  const plane = planes[imageId];
  if (!plane) return undefined;
  if (type === 'imagePlaneModule') {
    return {
      frameOfReferenceUID: plane.frameOfReferenceUID,
      imagePositionPatient: plane.imagePositionPatient,
      rowCosines: plane.imageOrientationPatient.slice(0, 3),
      columnCosines: plane.imageOrientationPatient.slice(3),
      rowPixelSpacing: plane.pixelSpacing[0],
      columnPixelSpacing: plane.pixelSpacing[1],
      rows: plane.rows,
      columns: plane.columns,
    };
  }
  return undefined;
}, 10000);

const seg = read(segPath);
const sr = read(srPath);
const imageIds = {};
for (const sop of Object.keys(planes)) imageIds[`${sop}:1`] = sop;

function measurementScoord(group) {
  const first = asArray(group.ContentSequence).find((item) => item.ValueType === 'NUM');
  return asArray(first?.ContentSequence).find((item) => item.ValueType === 'SCOORD');
}

const hooks = {
  getToolClass: (group) => {
    const scoord = measurementScoord(group);
    if (!scoord) return undefined;
    return scoord.GraphicType === 'POINT' ? Probe : scoord.GraphicType === 'POLYLINE' ? RectangleROI : undefined;
  },
};

const plain = MeasurementReport.generateToolState(sr, imageIds, metaData);
const state = MeasurementReport.generateToolState(sr, imageIds, metaData, hooks);
const measurements = [];
for (const [toolType, items] of Object.entries(state)) {
  for (const item of items) {
    measurements.push({
      toolType,
      trackingUniqueIdentifier: item.TrackingUniqueIdentifier,
      referencedImageId: item.annotation.metadata.referencedImageId,
      points: item.annotation.data.handles.points,
      findingSites: (item.findingSites || []).map((site) => site.CodeMeaning),
    });
  }
}
const groups = asArray(asArray(sr.ContentSequence).find((item) => item.ConceptNameCodeSequence[0].CodeValue === '126010')?.ContentSequence);
console.log(
  JSON.stringify({
    segmentLabels: asArray(seg.SegmentSequence).map((segment) => segment.SegmentLabel),
    segFrames: Number(seg.NumberOfFrames),
    srTemplate: sr.ContentTemplateSequence[0].TemplateIdentifier,
    measurementGroups: groups.length,
    withoutHooks: Object.keys(plain),
    measurements,
  }),
);
